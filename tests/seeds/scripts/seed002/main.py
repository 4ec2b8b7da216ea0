# Seed 002, sample code main.py: split a batch of 2 over two workers ("dual-core"), as the seed's
# "Performing Dual-card/Dual-core Parallel Samples" shows. The seed gives the data slicing and the
# messages it prints; the loading of inputs and saving of the result (so that a test can compare them
# with the whole model) are marked "# reconstructed:"; "# changed:" lines differ from the seed.
import time  # reconstructed:

import numpy as np  # reconstructed:

from parallel_predict_utils import ParallelPredictUtils  # reconstructed:

mindir_path = "sd_bs1.onnx"  # changed: was the converted SD2.1 MindIR path (batch 1)

if __name__ == "__main__":  # reconstructed:
    inputs = np.load("inputs.npz")  # reconstructed:
    sample, timestep, encoder_hidden_states = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]  # reconstructed:
    mslite_predict_utils = ParallelPredictUtils(mindir_path, 2)  # reconstructed:
    mslite_predict_utils.build_model()  # reconstructed:

    # data slice
    input_data_0 = [sample[0], timestep, encoder_hidden_states[0]]
    input_data_1 = [sample[1], timestep, encoder_hidden_states[1]]
    input_data_all = [input_data_0, input_data_1]

    start = time.time()  # reconstructed:
    predict_result = mslite_predict_utils.run_predict(input_data_all)  # reconstructed:
    print("Total predict time = ", time.time() - start)  # reconstructed:
    mslite_predict_utils.finalize()  # reconstructed:
    np.save("result.npy", np.concatenate([r[0] for r in predict_result]))  # reconstructed:
    print("=========== success ===========")  # reconstructed:
