"""Stage 1, text to syntax tree: the grammar (grammar.lark), the parser (parser.py, with the
newline rules and the source limits), the frozen, spanned AST (ast.py), and the formatter
that prints an AST back in the canonical layout (fmt.py). Nothing here knows names or types."""
