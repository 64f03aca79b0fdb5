"""The MoD engine: router, routing context, MoD layer, MoD cache, PRD schedules, injection."""
