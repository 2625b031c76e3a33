"""The finetuning recipes' shared code: flags, data, model setup, training runner, evaluation.

Importing it quiets third-party messages a user cannot act on (each one named below); any
--log_level other than the default 'passive' shows them again (recipe.task.task_flags).
It imports nothing heavy: `--help` and flag errors must stay fast.
"""

import logging
import warnings

# bitsandbytes' CPU backend looks for an optional `kernels` download at import and warns when it
# is absent; its built-in fallback is what runs, and nothing is for the user to do.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# (message pattern, category) of warnings that say nothing to the user.
QUIET_WARNINGS = (
    # DeepSpeed's gloo path (CPU runs) calls torch's deprecated all_gather_into_tensor alias.
    (r".*all_gather_into_tensor.*", FutureWarning),
    # PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` property.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


def quiet_libraries(quiet: bool = True) -> None:
    """Hides (quiet) or shows again the messages above."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
    for message, category in QUIET_WARNINGS:
        if quiet:
            warnings.filterwarnings("ignore", message=message, category=category)
        else:
            warnings.filters[:] = [f for f in warnings.filters
                                   if not (f[0] == "ignore" and f[1] is not None and f[1].pattern == message
                                           and f[2] is category)]


quiet_libraries()
