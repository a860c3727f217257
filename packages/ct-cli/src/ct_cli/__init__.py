"""ct_cli"""
