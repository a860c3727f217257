"""ct_model"""
