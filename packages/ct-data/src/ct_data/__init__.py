"""ct_data"""
