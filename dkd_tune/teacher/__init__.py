"""Floor 2, teachers: the logit gap, the logit cache, preparing a teacher once, the negative control's teacher and auto-beta."""
