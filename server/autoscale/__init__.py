"""The autoscaler: worker groups that grow with their queue and shrink to ``min_workers``
(zero included). ``rules`` decides (a pure function), ``loop`` runs it in one server at a
time, ``groups`` reads what it decides on, ``integrations`` apply the decisions."""
