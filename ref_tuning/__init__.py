"""ref-tuning: fine-tune Sheared-LLaMA-2.7B on CodeContests as the reference model for Rho-1."""

import logging

# torchao warns at import, once per process, that it skips its C++ extensions when torch is newer than the
# torch it was built for; nothing here uses them. Imported before torchtune (which imports torchao), this hides it.
logging.getLogger("torchao").addFilter(lambda record: "Skipping import of cpp extensions" not in record.getMessage())
