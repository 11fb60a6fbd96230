"""Stages 5 and 6, graph and checkpoint headers to a plan: the per-key jobs and their memory
(schedule.py), keys run in chunks (outofcore.py), Ray groups (groups.py), what the runtime
runs (executable.py, serializable), the plan as data and its renderings (report.py), and the
compile pipeline that strings stages 2 to 6 together (compile.py). Never reads tensor data,
never imports torch."""
