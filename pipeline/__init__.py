"""layerwarm's domain: references, registry access, codecs, cache tiers and stages.

Nothing in this package imports celery or redis; `workers/` wraps it for Celery.
"""
