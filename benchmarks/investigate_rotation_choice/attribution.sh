set -x
C="--target simulate --a-bits 16 --w-clip act --rounding rtn --calib-data ../shared/data/wikitext-2/valid.txt --calib-samples 16"
perq-onnx optimize smollm2 $C --residual-rotation full --no-head-rotation --block none --permute none -o out/investigate/r1/model.onnx --report out/investigate/r1.json
python benchmarks/investigate_rotation_choice/eval_windows.py out/investigate/r1/model.onnx test 32 8
perq-onnx optimize smollm2 $C --residual-rotation none --no-head-rotation --block 16 --permute massdiff -o out/investigate/r3/model.onnx --report out/investigate/r3.json
python benchmarks/investigate_rotation_choice/eval_windows.py out/investigate/r3/model.onnx test 32 8
perq-onnx optimize smollm2 $C --residual-rotation none --no-head-rotation --block none --permute none -o out/investigate/r0/model.onnx --report out/investigate/r0.json
python benchmarks/investigate_rotation_choice/eval_windows.py out/investigate/r0/model.onnx test 32 8
