"""epmq.calib"""
