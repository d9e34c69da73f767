from model.ad import AD, MODEL, ADConfig, weights_digest

__all__ = ["AD", "MODEL", "ADConfig", "weights_digest"]
