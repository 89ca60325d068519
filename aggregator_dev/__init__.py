"""Development tools of battery-aggregator: a private bus, an MQTT broker, the simulator, the demo and the
benchmarks. The service never imports this package (a test holds it to that) and the GX release does not ship it.
"""
