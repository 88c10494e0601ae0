import onnx, onnxruntime as ort, numpy as np, time, sys
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
rng=np.random.default_rng(0)
def sess(nodes, inits, M, K):
    g=h.make_graph(nodes,"g",[h.make_tensor_value_info("A",TP.FLOAT,[M,K])],[h.make_tensor_value_info("Y",TP.FLOAT,None)],inits)
    m=h.make_model(g,opset_imports=[h.make_opsetid("",21),h.make_opsetid("com.microsoft",1)]); m.ir_version=10
    so=ort.SessionOptions(); so.intra_op_num_threads=2
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
for (M,K,N) in [(1,576,1536),(1,1536,576),(1,576,49152),(512,576,49152),(512,1536,576)]:
    W=rng.standard_normal((K,N)).astype(np.float32)
    fp=sess([h.make_node("MatMul",["A","W"],["Y"])],[nh.from_array(W,"W")],M,K)
    Wq=np.clip(np.round(W/0.05),-7,7).astype(np.int8)
    dq=sess([h.make_node("DynamicQuantizeMatMul",["A","Wq","s"],["Y"],domain="com.microsoft")],[nh.from_array(Wq,"Wq"),nh.from_array(np.full(N,0.05,np.float32),"s")],M,K)
    bs=32; codes=rng.integers(0,16,(N,K//bs,bs//2)).astype(np.uint8)
    nb=sess([h.make_node("MatMulNBits",["A","B","S"],["Y"],domain="com.microsoft",K=K,N=N,bits=4,block_size=bs,accuracy_level=4)],[nh.from_array(codes,"B"),nh.from_array(np.full((N,K//bs),0.05,np.float32),"S")],M,K)
    A=rng.standard_normal((M,K)).astype(np.float32)
    res={n:[] for n in "fp dq nb".split()}
    reps=200 if M==1 else 20
    for r in range(reps):
        for n,s in zip(res,[fp,dq,nb]):
            t=time.perf_counter(); s.run(None,{"A":A}); res[n].append(time.perf_counter()-t)
    print((M,K,N), {n:f"{1000*np.median(v):.3f}ms" for n,v in res.items()})
