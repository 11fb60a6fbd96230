"""`kmx run --executor ray`: the same executable schedule, its key groups run as Ray tasks."""
