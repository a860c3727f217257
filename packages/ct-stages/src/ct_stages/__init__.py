"""ct_stages"""
