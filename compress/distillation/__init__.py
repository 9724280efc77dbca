"""Knowledge distillation's mechanics, built on ``training``: the losses (``losses``), the teacher
a fit distils from (``teacher``: ``Distillation`` and its per-batch loss, cached teacher logits),
and one student trained from a teacher with its from-scratch control, measured and summarised
(``job``, ``outcome``). ``training.fit`` takes a ``Distillation`` through its ``Distiller``
protocol and never imports this package; the stage wires the rest."""
