"""titlegen.eval"""
