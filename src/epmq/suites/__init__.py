"""epmq.suites"""
