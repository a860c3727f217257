"""ct_precision"""
