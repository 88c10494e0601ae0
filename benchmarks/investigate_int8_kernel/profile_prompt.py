import onnxruntime as ort, numpy as np, json, sys, collections, time
folder=sys.argv[1]
so=ort.SessionOptions(); so.intra_op_num_threads=int(__import__("os").environ.get("THR","2")); so.enable_profiling=True; so.profile_file_prefix="/tmp/prof/"+folder.strip('/').split('/')[-1]
s=ort.InferenceSession(folder+"/model.onnx",so,providers=["CPUExecutionProvider"])
T=512
feeds={}
for i in s.get_inputs():
    if i.name=="input_ids": feeds[i.name]=np.random.randint(0,49000,(1,T)).astype(np.int64)
    elif i.name=="attention_mask": feeds[i.name]=np.ones((1,T),np.int64)
    elif i.name=="position_ids": feeds[i.name]=np.arange(T)[None].astype(np.int64)
    else:
        feeds[i.name]=np.zeros((1,3,0,64),np.float32)
for r in range(4):
    t=time.perf_counter(); s.run(None,feeds); print(r, time.perf_counter()-t)
p=s.end_profiling()
ev=json.load(open(p))
agg=collections.Counter()
for e in ev:
    if e.get("cat")=="Node" and e["name"].endswith("_kernel_time"):
        agg[e["args"]["op_name"]]+=e["dur"]
tot=sum(agg.values())
for k,v in agg.most_common(12): print(f"{k:35s} {v/4/1000:8.1f} ms  {100*v/tot:5.1f}%")
# lm_head
lm=collections.Counter()
for e in ev:
    if e.get("cat")=="Node" and e["name"].endswith("_kernel_time") and ("lm_head" in e["name"]):
        lm[e["name"]]+=e["dur"]
for k,v in lm.items(): print(k, v/4/1000)
