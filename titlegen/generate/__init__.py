"""titlegen.generate"""
