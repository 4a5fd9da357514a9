"""epmq.eval"""
