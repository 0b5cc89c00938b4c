"""The offline HTML page: the verdict table and sentences (verdict), the figures (figures) and the
page around them (html)."""
