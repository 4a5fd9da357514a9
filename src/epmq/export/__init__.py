"""epmq.export"""
