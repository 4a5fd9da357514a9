"""epmq.merging"""
