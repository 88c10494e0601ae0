# Locates the onnxruntime C API headers (onnxruntime_c_api.h).
#
# Order: -DORT_INCLUDE_DIR=..., then the ORT_INCLUDE_DIR environment variable, then a copy
# fetched earlier into the build directory, then a fresh fetch of the npm package
# com.github.asus4.onnxruntime@0.4.9 (its iOS framework holds the full header set at
# ORT_API_VERSION 29), with `npm pack` when npm is on PATH, else a plain download of the same
# tarball from the npm registry. Only the headers are kept; the tarball is deleted.
# Sets ORT_INCLUDE_DIR (cache) to the directory holding onnxruntime_c_api.h.

set(PERQ_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime" CACHE STRING "npm package holding the onnxruntime headers")
set(PERQ_ORT_NPM_VERSION "0.4.9" CACHE STRING "version of that npm package")
set(PERQ_ORT_NPM_SHA256 "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
    CACHE STRING "sha256 of the npm tarball (empty: do not check)")
set(_perq_ort_header_path "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers")

if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR} AND NOT "$ENV{ORT_INCLUDE_DIR}" STREQUAL "")
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}" CACHE PATH "directory holding onnxruntime_c_api.h" FORCE)
endif()

if(ORT_INCLUDE_DIR)
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} holds no onnxruntime_c_api.h")
  endif()
  message(STATUS "perq_ops: onnxruntime headers from ${ORT_INCLUDE_DIR}")
  return()
endif()

set(_perq_ort_dir "${CMAKE_BINARY_DIR}/ort_headers")
set(_perq_ort_inc "${_perq_ort_dir}/include")
if(NOT EXISTS "${_perq_ort_inc}/onnxruntime_c_api.h")
  set(_tgz "${_perq_ort_dir}/${PERQ_ORT_NPM_PACKAGE}-${PERQ_ORT_NPM_VERSION}.tgz")
  file(MAKE_DIRECTORY "${_perq_ort_dir}")
  find_program(PERQ_NPM npm)
  if(PERQ_NPM)
    message(STATUS "perq_ops: fetching onnxruntime headers: npm pack ${PERQ_ORT_NPM_PACKAGE}@${PERQ_ORT_NPM_VERSION}")
    execute_process(
      COMMAND "${PERQ_NPM}" pack "${PERQ_ORT_NPM_PACKAGE}@${PERQ_ORT_NPM_VERSION}" --silent
      WORKING_DIRECTORY "${_perq_ort_dir}"
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0 OR NOT EXISTS "${_tgz}")
      message(FATAL_ERROR "perq_ops: `npm pack ${PERQ_ORT_NPM_PACKAGE}@${PERQ_ORT_NPM_VERSION}` failed (${_rc}): ${_err}"
                          " -- set ORT_INCLUDE_DIR to a directory holding the onnxruntime C API headers")
    endif()
  else()
    set(_url "https://registry.npmjs.org/${PERQ_ORT_NPM_PACKAGE}/-/${PERQ_ORT_NPM_PACKAGE}-${PERQ_ORT_NPM_VERSION}.tgz")
    message(STATUS "perq_ops: npm not found; downloading ${_url}")
    file(DOWNLOAD "${_url}" "${_tgz}" STATUS _st)
    list(GET _st 0 _rc)
    if(NOT _rc EQUAL 0)
      list(GET _st 1 _msg)
      file(REMOVE "${_tgz}")
      message(FATAL_ERROR "perq_ops: download of ${_url} failed: ${_msg}"
                          " -- set ORT_INCLUDE_DIR to a directory holding the onnxruntime C API headers")
    endif()
  endif()
  if(PERQ_ORT_NPM_SHA256)
    file(SHA256 "${_tgz}" _sha)
    if(NOT _sha STREQUAL PERQ_ORT_NPM_SHA256)
      file(REMOVE "${_tgz}")
      message(FATAL_ERROR "perq_ops: ${_tgz} has sha256 ${_sha}, expected ${PERQ_ORT_NPM_SHA256}")
    endif()
  endif()
  find_program(PERQ_TAR tar)
  set(_x "${_perq_ort_dir}/extract")
  file(REMOVE_RECURSE "${_x}")
  file(MAKE_DIRECTORY "${_x}")
  if(PERQ_TAR)  # extract the headers only
    execute_process(COMMAND "${PERQ_TAR}" xzf "${_tgz}" "${_perq_ort_header_path}"
                    WORKING_DIRECTORY "${_x}" RESULT_VARIABLE _rc ERROR_VARIABLE _err)
  else()
    execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xzf "${_tgz}"
                    WORKING_DIRECTORY "${_x}" RESULT_VARIABLE _rc ERROR_VARIABLE _err)
  endif()
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_x}/${_perq_ort_header_path}/onnxruntime_c_api.h")
    message(FATAL_ERROR "perq_ops: no onnxruntime_c_api.h at ${_perq_ort_header_path} in ${_tgz} (${_err})")
  endif()
  file(REMOVE_RECURSE "${_perq_ort_inc}")
  file(RENAME "${_x}/${_perq_ort_header_path}" "${_perq_ort_inc}")
  file(REMOVE_RECURSE "${_x}")
  file(REMOVE "${_tgz}")
endif()
set(ORT_INCLUDE_DIR "${_perq_ort_inc}" CACHE PATH "directory holding onnxruntime_c_api.h" FORCE)
message(STATUS "perq_ops: onnxruntime headers in ${ORT_INCLUDE_DIR}")
