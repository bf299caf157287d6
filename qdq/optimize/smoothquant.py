from __future__ import annotations


def smooth(model, plan, data, config):
    return model, []
