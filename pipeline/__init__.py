"""Components with one job each; the stages in dskd.stages compose them."""
