"""ct_distill"""
