import sys, json, pathlib
from perq_onnx.models import resolve
from perq_onnx import calibration
from perq_onnx.evaluate import perplexity
path, split, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = calibration.load_tokenizer(pathlib.Path(resolve("smollm2")).parent)
ids = calibration.tokenize_file(f"../shared/data/wikitext-2/{split}.txt", tok)
wins = calibration.windows(ids, 512, first + count, split)[first:first + count]
r = perplexity(path, wins, threads=2, progress=False)
print(json.dumps(dict(model=path, split=split, first=first, count=count, ppl=r.ppl, seconds=r.seconds)), flush=True)
