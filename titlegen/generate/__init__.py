"""Writing descriptions: decoding settings, decoding rules, titlegen's decoding loop, the dispatch between it and
transformers' ``generate``, and the predict CSV writer with its resume journal."""
