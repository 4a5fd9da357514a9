"""epmq.models"""
