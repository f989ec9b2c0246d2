"""Ansible's linear strategy run over Mitogen (ansible.cfg names it).

Mitogen keeps one Python interpreter per node and sends modules over it, instead of a fresh
ssh command and interpreter per task. Ansible's own overhead per task is what a no-op run is
made of, so this cuts a converged node's site.yml to about a third (README, "Speed").

This file only loads the plugin that the `mitogen` package ships (pinned in
ansible/requirements.txt), under its real module name, as that plugin's own proxy does.
To run without it: ANSIBLE_STRATEGY=linear.
"""

import ansible_mitogen.loaders
import ansible_mitogen.strategy


class StrategyModule(
    ansible_mitogen.strategy.StrategyMixin,
    ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True),
):
    pass
