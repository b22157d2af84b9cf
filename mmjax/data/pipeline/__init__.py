"""The input pipeline: the record stream (`stream`), the token sets of a config (`token_sets`), the
4M iterator (`fourm`), the demo fallback (`demo_tokens`) and `mmjax bench data` (`bench`)."""
