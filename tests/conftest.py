"""Shared pytest set-up: a modest, deadline-free hypothesis profile."""

import hypothesis

hypothesis.settings.register_profile(
    'moejax', max_examples=40, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile('moejax')
