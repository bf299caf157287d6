from __future__ import annotations


def equalize(model, plan):
    return model, []
