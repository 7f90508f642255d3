"""The paper's applications, ready to run: latent tasks on a local pipeline or the embedded digits
(:mod:`~sdo.recipes.latent_tasks`: edit, style, aesthetic, adversarial), the adversarial comparison
(:mod:`~sdo.recipes.attack`), ready fine-tuning tasks (:mod:`~sdo.recipes.finetune_tasks`), and noise optimization
against weighted rewards with ReNO's or DNO's regularizer (:mod:`~sdo.recipes.noise`); what the latent tasks and
noise optimization share is in :mod:`~sdo.recipes.runs`."""
