"""ct_parallel"""
