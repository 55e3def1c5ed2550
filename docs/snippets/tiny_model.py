from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# A tiny model and tokenizer so that this runs anywhere; use your own instead, e.g.
# AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B") and AutoTokenizer.
vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *"abcdefghij+=0123456789 "])}
backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
backend.decoder = decoders.Fuse()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left"
)
model = Qwen3ForCausalLM(
    Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_cache=False,
    )
)
