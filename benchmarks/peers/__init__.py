"""maxbatch next to its peers: workloads, tool runners, brute-force truth, report (``run.py``)."""
