"""One module per delivery workload, each `run(bench, system, ...)` -> the figures it reports.

a_user_streams     (a) N streams, each following its own user; R events/s keyed by user: latency, loss
b_broadcast        (b) the same streams on one broadcast at a rate: deliveries/s achieved, latency, loss
c_idle_streams     (c) many idle streams: web-process RSS per stream, threads, time to connect them all
d_connect_cycles   (d) connect/disconnect cycles: web RSS and asyncio tasks before and after (no leaks)
"""
