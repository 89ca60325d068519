"""Power dispatcher: one total power target split across independently controlled batteries, with a per-battery
model learned online (gain, lag, dead time, limits per SoC band).

    core/        pure: model.py (what a battery does with a setpoint), controller.py (the split), faults.py
    settings.py  the `dispatcher` config section (pydantic)
    adapters.py  reading and writing devices over D-Bus or MQTT (the link of mqtt/link.py)
    runtime.py   the dispatcher inside the service: its paths on the aggregate, its MQTT state and commands
"""
