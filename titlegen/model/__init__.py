"""titlegen.model"""
