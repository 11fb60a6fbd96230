"""Stage 2, syntax tree to checked program: load the recipe and its imports, resolve params and
`--set` values (program.py), bind names and arguments (binder.py), type-check every
declaration and save (typecheck.py, rules.py, values.py). `checker.check_program` drives it and
returns a `Program` only when there is no error."""
