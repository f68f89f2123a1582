"""`daralign compare`: several methods on one request budget (run.py), the offline pairs bought
from it (offline.py), gold/proxy curves and their statistics (curves.py) and the report (report.py)."""
