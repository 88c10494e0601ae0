import onnx, onnxruntime as ort, numpy as np, time
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
M,K,N=512,576,1536
rng=np.random.default_rng(0)
W=rng.standard_normal((K,N)).astype(np.float32)
def sess(nodes, inits, opset_ms=True):
    g=h.make_graph(nodes,"g",[h.make_tensor_value_info("A",TP.FLOAT,[M,K])],[h.make_tensor_value_info("Y",TP.FLOAT,None)],inits)
    ops=[h.make_opsetid("",21),h.make_opsetid("com.microsoft",1)]
    m=h.make_model(g,opset_imports=ops); m.ir_version=10
    so=ort.SessionOptions(); so.intra_op_num_threads=2
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
fp=sess([h.make_node("MatMul",["A","W"],["Y"])],[nh.from_array(W,"W")])
Wq=np.clip(np.round(W/0.05),-127,127).astype(np.int8)
dq=sess([h.make_node("DynamicQuantizeMatMul",["A","Wq","s"],["Y"],domain="com.microsoft")],[nh.from_array(Wq,"Wq"),nh.from_array(np.full(N,0.05,np.float32),"s")])
# uint8 weights variant
Wu=(Wq.astype(np.int16)+128).astype(np.uint8)
#dqu=sess([h.make_node("DynamicQuantizeMatMul",["A","Wu","s","","zp"],["Y"],domain="com.microsoft")],[nh.from_array(Wu,"Wu"),nh.from_array(np.full(N,0.05,np.float32),"s"),nh.from_array(np.full(N,128,np.uint8),"zp")])
# MatMulNBits
bs=32
codes=rng.integers(0,16,(N,K//bs,bs//2)).astype(np.uint8)
nb=[]
for acc in (0,4):
    nb.append(sess([h.make_node("MatMulNBits",["A","B","S"],["Y"],domain="com.microsoft",K=K,N=N,bits=4,block_size=bs,accuracy_level=acc)],[nh.from_array(codes,"B"),nh.from_array(np.full((N,K//bs),0.05,np.float32),"S")]))
A=rng.standard_normal((M,K)).astype(np.float32)
names=["fp32","dqmm_s8","nbits0","nbits4"]; ss=[fp,dq]+nb
res={n:[] for n in names}
for r in range(40):
    for n,s in zip(names,ss):
        t=time.perf_counter(); s.run(None,{"A":A}); res[n].append(time.perf_counter()-t)
for n in names: print(n, f"{1000*np.median(res[n]):.2f} ms")

y0=fp.run(None,{"A":A})[0]; y1=dq.run(None,{"A":A})[0]; yr=A@(Wq.astype(np.float32)*0.05)
print("dq rel err vs exact", np.linalg.norm(y1-yr)/np.linalg.norm(yr))
for n in names: print(n, [round(1000*x,1) for x in res[n][:10]])
