"""The `lmforge` subcommands, one module each: argparse -> config -> one library call.

Each module has `add_arguments(parser)` and `run(args) -> int`; no module outside this package
builds a parser. A command's module is imported only when that command runs (or shows its
--help), so that `lmforge prepare --help` never imports torch.
"""

# name -> (module, one-line help shown by `lmforge --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("env", "print torch version, device, threads, CPU peak, compile and flash attention"),
    "model-info": ("model_info", "parameters by part, training memory and FLOPs per token"),
    "prepare": ("prepare", "turn text into token files (train.bin, val.bin, meta.json)"),
    "train": ("train", "pretrain a model (phase 1) on prepared data"),
    "sft": ("sft", "instruction-tune a pretrained model (phase 2)"),
    "generate": ("generate", "sample text from a checkpoint, streamed (phase 1 or SFT)"),
    "chat": ("chat", "talk to an instruction-tuned checkpoint (multi-turn, streaming)"),
    "eval": ("eval", "loss/perplexity on prepared data; EM/F1/accuracy on Q&A data"),
    "export": ("export", "export a checkpoint to Hugging Face (transformers) or GGUF (llama.cpp)"),
    "report": ("report", "plots and a text summary of a run or a training log"),
    "compare": ("compare", "overlay the loss curves of several runs"),
}
