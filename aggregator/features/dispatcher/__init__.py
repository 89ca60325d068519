"""Power dispatcher (issue #8): one total power target split across independently controlled batteries, with
a per-battery model learned online (gain, lag, dead time, limits per SoC band). `model` and `controller` are
pure; `simulation` holds simulated batteries, meters, household demand and the baseline dispatchers.
"""
