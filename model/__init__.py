from model.ad import AD, MODEL, ADConfig

__all__ = ["AD", "MODEL", "ADConfig"]
