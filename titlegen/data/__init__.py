"""titlegen.data"""
