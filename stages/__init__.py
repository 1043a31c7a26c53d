"""The three stages (cache-teacher, distill, eval) plus quickstart, each a readable recipe."""
