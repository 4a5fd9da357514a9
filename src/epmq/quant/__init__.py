"""epmq.quant"""
